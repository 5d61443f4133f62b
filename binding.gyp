{
  "targets": [
    {
      "target_name": "fsx",
      "sources": ["src/native/fsx.c"],
      "cflags": ["-O2", "-Wall", "-Wextra"]
    }
  ]
}
