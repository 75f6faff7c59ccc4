"""The command line's subcommands (``userfaultfd demo|info|serve|bench|ws|snapshot``). They use
the library; the library never imports them."""
