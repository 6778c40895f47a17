"""Data: readers (sources), per-method batch transforms (views), sharding and masks."""
