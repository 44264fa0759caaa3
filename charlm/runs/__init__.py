"""Run directories: naming, locking, metrics, listing and plotting."""
