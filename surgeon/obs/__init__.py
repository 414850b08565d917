"""Closed-form removal costs and weight updates under Kronecker-factored curvature (optimal brain surgeon)."""
