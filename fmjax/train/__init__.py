"""The one trainer shared by every model family."""
