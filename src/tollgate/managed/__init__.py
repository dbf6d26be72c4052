"""Keys and roles managed at run time through DIAL's Configuration API (compatibility C81).

`entities` parses and checks what a client sends and what the store holds; `registry` keeps the
live keys and roles of this instance, reads and writes them in the resource store, and follows
the changes other instances make; `audit` records every change. The HTTP surface is
`tollgate.http.config_api`. See docs/key-management.md.
"""
