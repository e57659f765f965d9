"""Built-in QAT methods: one module each, registered by `@METHODS.register(name)`."""
