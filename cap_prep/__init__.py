"""cap-prep: tokenize and pack datasets into memory-mappable Arrow shards."""
