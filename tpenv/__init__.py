"""tpenv: the client. See docs/ and ../shared/DESIGN.md."""
