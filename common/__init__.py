"""Code shared by two or more paper scripts; each module is importable alone."""
