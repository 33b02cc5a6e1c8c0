"""The MCP edge: the SDK server Castellan mounts (`server`) and its handlers, one module per part of the protocol."""
