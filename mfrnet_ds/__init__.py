"""mfrnet-ds."""
