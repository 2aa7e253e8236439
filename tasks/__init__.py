"""Reusable tasks of swagger2mcp-ops: one module per external system, plain typed functions first."""
