"""Flows of swagger2mcp-ops: one module per runbook procedure."""
