"""One module per verb: ``HELP`` (one line), ``add_arguments(parser)``, ``async run(args, ctx) -> int``.

The order of VERBS is the order of ``tpenv --help``.
"""
VERBS = ("up", "down", "status", "list", "intercept", "leave", "connect", "quit", "env", "init",
         "uninstall", "manager", "validate", "schema", "doctor", "completion")
