"""One module per `giseg <command>`: argument parsing and the command's own flow, on the layers below."""
