"""Command-line commands, each a module that adds its parser and runs on the library."""
