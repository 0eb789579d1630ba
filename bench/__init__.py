"""edgecl.bench."""
