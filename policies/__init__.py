"""The Starlark library shipped with starmesh, loaded as `@starmesh//NAME.star`."""
