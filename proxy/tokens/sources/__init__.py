"""One module per way of getting a token."""
