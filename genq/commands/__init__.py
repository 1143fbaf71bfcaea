"""One module per group of `genq` subcommands. Each registers its parsers and imports its side
(producer, workers, or both) only inside the function that runs, so `genq --help` needs neither."""
