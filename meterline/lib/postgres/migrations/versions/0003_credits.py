"""Prepaid credits: grants, the append-only ledger, what each debit drew from.

Revision ID: 0003
Revises: 0002
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A grant's terms never change; what is left of it (remaining_usd) is kept by the
    # ledger's postings, under the account's lock, and checkable against them.
    op.execute(
        """
        CREATE TABLE credit_grants (
            grant_id text PRIMARY KEY,
            account_id text NOT NULL
                CONSTRAINT credit_grants_account_fkey REFERENCES accounts (account_id),
            kind text NOT NULL CHECK (kind IN ('purchased', 'promotional')),
            amount_usd numeric(38, 12) NOT NULL CHECK (amount_usd > 0),
            remaining_usd numeric(38, 12) NOT NULL
                CHECK (remaining_usd >= 0 AND remaining_usd <= amount_usd),
            priority integer NOT NULL DEFAULT 10 CHECK (priority BETWEEN 0 AND 1000),
            effective_at timestamptz NOT NULL,
            expires_at timestamptz CHECK (expires_at IS NULL OR expires_at > effective_at),
            -- set when its remainder was released: voided or expired
            closed_at timestamptz,
            created_at timestamptz NOT NULL DEFAULT now(),
            created_by text NOT NULL DEFAULT '' CHECK (length(created_by) <= 256)
        )
        """
    )
    op.execute("CREATE INDEX credit_grants_by_account ON credit_grants (account_id)")
    # Never updated nor deleted. amount_usd is signed: + grants and credits, - the rest.
    op.execute(
        """
        CREATE TABLE ledger_entries (
            entry_id bigserial PRIMARY KEY,
            account_id text NOT NULL
                CONSTRAINT ledger_entries_account_fkey REFERENCES accounts (account_id),
            kind text NOT NULL CHECK (kind IN ('grant', 'debit', 'adjustment', 'void', 'expiry')),
            amount_usd numeric(38, 12) NOT NULL,
            effective_at timestamptz NOT NULL,
            -- chosen by the source: a retried top-up or a replayed batch posts once
            idempotency_key text NOT NULL CHECK (length(idempotency_key) BETWEEN 1 AND 256),
            grant_id text REFERENCES credit_grants (grant_id),
            reason text NOT NULL DEFAULT '' CHECK (length(reason) <= 1024),
            created_by text NOT NULL DEFAULT '' CHECK (length(created_by) <= 256),
            created_at timestamptz NOT NULL DEFAULT now(),
            -- debits: the usage they are for
            events integer CHECK (events IS NULL OR events >= 1),
            usage_from timestamptz,
            usage_to timestamptz,
            CONSTRAINT ledger_entries_idempotent UNIQUE (account_id, idempotency_key)
        )
        """
    )
    op.execute("CREATE INDEX ledger_entries_by_account ON ledger_entries (account_id, entry_id)")
    # Which grants each debit (or negative adjustment) drew from, in burn order; a part
    # no grant covered is drawn when the next grant comes (entry_id stays the debit's).
    op.execute(
        """
        CREATE TABLE ledger_draws (
            entry_id bigint NOT NULL REFERENCES ledger_entries (entry_id),
            grant_id text NOT NULL REFERENCES credit_grants (grant_id),
            amount_usd numeric(38, 12) NOT NULL CHECK (amount_usd > 0),
            drawn_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (entry_id, grant_id)
        )
        """
    )
    # One row an account: its lock (postings are serialized by it), its balance (the
    # sum of its entries) and what its debits drew beyond its grants, still owed.
    op.execute(
        """
        CREATE TABLE credit_accounts (
            account_id text PRIMARY KEY
                CONSTRAINT credit_accounts_account_fkey REFERENCES accounts (account_id),
            balance_usd numeric(38, 12) NOT NULL DEFAULT 0,
            owed_usd numeric(38, 12) NOT NULL DEFAULT 0 CHECK (owed_usd >= 0),
            -- one more at each posting: a copy of the balance (Redis) keeps the newest
            version bigint NOT NULL DEFAULT 0,
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    # Every priced event a debit holds, with its charge: a replayed batch finds its
    # events here and posts only the others; the check against the warehouse reads it.
    op.execute(
        """
        CREATE TABLE debited_events (
            account_id text NOT NULL,
            event_id text NOT NULL,
            occurred_at timestamptz NOT NULL,
            charge_usd numeric(38, 12) NOT NULL CHECK (charge_usd >= 0),
            entry_id bigint NOT NULL REFERENCES ledger_entries (entry_id),
            PRIMARY KEY (account_id, event_id)
        )
        """
    )
    op.execute("CREATE INDEX debited_events_by_time ON debited_events (account_id, occurred_at)")


def downgrade() -> None:
    for table in (
        "debited_events",
        "credit_accounts",
        "ledger_draws",
        "ledger_entries",
        "credit_grants",
    ):
        op.execute(f"DROP TABLE {table}")
