// Why: an NBD READ sends runs of zero blocks as holes, and finding them means looking at
// every block of the data. The reader that filled the buffer can count them on the thread
// that just wrote the bytes (fsx.preadScan), where they are still in its cache; from the
// event loop the same scan cost a cache miss per page. This is the small request a reader
// may answer: the NBD layer asks, a file store fills it in, layers in between pass it on
// or leave it unanswered (zeroBlocks stays -1, and the asker scans for itself).

/** "Count the all-zero blocks of blockBytes in what you read into the target." */
export interface ZeroBlockScan {
  /** Block size of the scan, counted from the start of the read (the last may be shorter). */
  readonly blockBytes: number;
  /** Filled by the reader: how many blocks are all zero; -1 while nobody counted. */
  zeroBlocks: number;
}

export function zeroBlockScan(blockBytes: number): ZeroBlockScan {
  return { blockBytes, zeroBlocks: -1 };
}
