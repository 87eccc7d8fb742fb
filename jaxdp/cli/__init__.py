"""The `jaxdp` command line: one module per subcommand (its flags and `run(args)`), `main` dispatches."""
