"""Sub-commands of the `fm9g` console script: one module each, with `add_parser(subparsers)` and `run(args)`."""
