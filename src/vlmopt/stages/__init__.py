"""One module per stage; each declares its options as a dataclass and has one `run` entry point."""
