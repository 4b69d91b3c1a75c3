"""Spend budgets: dollars per user, client or environment per calendar period, from the audit."""
