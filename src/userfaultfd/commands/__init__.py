"""The command line's subcommands, one module each: each exposes ``add_parser(sub)`` and the
handler it sets as ``func``."""
