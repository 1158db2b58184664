"""Everything about the engine process: finding it, its command line, its lifecycle."""
