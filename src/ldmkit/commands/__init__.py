"""One module per ``ldmkit`` command: ``add_arguments(parser)`` and ``run(args)``, thin over the libraries
(docs/DESIGN.md, Commands). The top layer: commands import any layer, nothing imports them but cli.py."""
