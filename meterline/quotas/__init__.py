"""Plans, rate limits and quotas: what an account may do now (see :mod:`.plans`)."""
