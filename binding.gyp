{
  "targets": [
    {
      "target_name": "fsx",
      "sources": ["src/native/fsx.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    },
    {
      "target_name": "sockx",
      "sources": ["src/native/sockx.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    },
    {
      "target_name": "pipex",
      "sources": ["src/native/pipex.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
