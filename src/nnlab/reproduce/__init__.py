"""``nnlab reproduce``: run all four studies end to end and write a report beside the seed's numbers."""
