"""Shipped training recipes (TOML), loadable by name with `resnext train --config NAME`."""
