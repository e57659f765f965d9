"""Built-in tasks: one module per task family, registered by `@TASKS.register(name)`."""
