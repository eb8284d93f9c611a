"""The ``ppt-bench`` subcommands that are more than a library call: demo, train, visualize."""
