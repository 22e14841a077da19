"""Built-in callbacks, one module per concern."""
