"""Accounts and API keys.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE accounts (
            account_id text PRIMARY KEY CHECK (account_id <> '' AND length(account_id) <= 128),
            name text NOT NULL DEFAULT '' CHECK (length(name) <= 256),
            status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
            timezone text NOT NULL DEFAULT 'UTC',
            currency text NOT NULL DEFAULT 'USD' CHECK (currency = 'USD'),
            metadata jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
            -- who made it: an admin (api, cli) or its first usage event
            registered_by text NOT NULL DEFAULT 'api',
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    # Every change to a key takes the next generation of the ring (one row, so
    # changes commit in generation order): a process that has seen generation
    # g has seen every change up to g, and asks only for what came after.
    op.execute(
        """
        CREATE TABLE key_ring (
            one boolean PRIMARY KEY DEFAULT true CHECK (one),
            generation bigint NOT NULL DEFAULT 0,
            -- HMAC of a fixed text under the server secret: a process with another
            -- secret would refuse every key, so it refuses to start instead
            secret_check bytea
        )
        """
    )
    op.execute("INSERT INTO key_ring (one) VALUES (true)")
    op.execute(
        """
        CREATE TABLE api_keys (
            key_id text PRIMARY KEY,
            kind text NOT NULL CHECK (kind IN ('admin', 'service', 'account')),
            name text NOT NULL DEFAULT '' CHECK (length(name) <= 256),
            secret_hash bytea NOT NULL CHECK (length(secret_hash) = 32),
            -- kind account: the one account it reads
            account_id text REFERENCES accounts (account_id),
            -- kind service: the accounts it may act for; NULL means all
            account_ids text[],
            created_at timestamptz NOT NULL DEFAULT now(),
            expires_at timestamptz,
            revoked_at timestamptz,
            last_used_at timestamptz,
            generation bigint NOT NULL,
            CHECK ((kind = 'account') = (account_id IS NOT NULL)),
            CHECK (kind = 'service' OR account_ids IS NULL)
        )
        """
    )
    op.execute("CREATE INDEX api_keys_by_generation ON api_keys (generation)")
    op.execute("CREATE INDEX api_keys_by_account ON api_keys (account_id)")
