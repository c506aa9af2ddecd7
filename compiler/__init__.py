"""Policy compiler: Starlark policy files -> validated Spec -> canonical Bundle."""
