"""edgecl.devices."""
