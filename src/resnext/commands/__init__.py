"""Sub-commands of the `resnext` CLI, one module each."""
