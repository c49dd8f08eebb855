"""CLI subcommands, one module each. Every module defines ``register(subparsers)``, which adds its
parser and sets ``func`` to a callable taking the parsed namespace and returning an exit code.
Modules import their heavy or optional dependencies inside ``func``, so ``lesioncount --help`` stays
fast and works without the extras."""
