// The `weir` executable. Each subcommand lives in its own file; the logic
// that tests exercise directly (config checks, servers) lives in libraries.
WeirCommand.main()
