"""One module per `red` command, and the checks they make before torch is imported."""
