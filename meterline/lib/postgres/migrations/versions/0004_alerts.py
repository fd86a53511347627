"""Alerts: each account's thresholds and webhook, the alerts fired, their deliveries.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # What an account wants to hear of. A balance rule is armed until it fires and
    # armed again when the balance is back at or above its threshold (one alert a
    # crossing); crossings counts its alerts, so each has a key of its own.
    op.execute(
        """
        CREATE TABLE alert_rules (
            rule_id text PRIMARY KEY,
            account_id text NOT NULL
                CONSTRAINT alert_rules_account_fkey REFERENCES accounts (account_id),
            kind text NOT NULL
                CHECK (kind IN ('balance_below', 'credits_expiring', 'spend_share',
                                'tokens_share')),
            threshold_usd numeric(38, 12) CHECK (threshold_usd >= 0),
            within_s bigint CHECK (within_s > 0),
            share_percent integer CHECK (share_percent BETWEEN 1 AND 1000),
            calendar text CHECK (calendar IN ('day', 'month')),
            armed boolean NOT NULL DEFAULT true,
            crossings integer NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL DEFAULT now(),
            created_by text NOT NULL DEFAULT '' CHECK (length(created_by) <= 256)
        )
        """
    )
    op.execute("CREATE INDEX alert_rules_by_account ON alert_rules (account_id)")
    # Where an account's alerts are posted. The signing secret is not stored: it is
    # derived from the server secret, the account and the generation (a new URL, a
    # new secret).
    op.execute(
        """
        CREATE TABLE alert_webhooks (
            account_id text PRIMARY KEY
                CONSTRAINT alert_webhooks_account_fkey REFERENCES accounts (account_id),
            url text NOT NULL CHECK (length(url) <= 2048),
            generation integer NOT NULL DEFAULT 1,
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    # An alert, once per (account, dedupe_key): the rule and what it crossed.
    op.execute(
        """
        CREATE TABLE alerts (
            alert_id text PRIMARY KEY,
            account_id text NOT NULL,
            rule_id text NOT NULL,
            dedupe_key text NOT NULL,
            kind text NOT NULL,
            fired_at timestamptz NOT NULL,
            payload jsonb NOT NULL,
            UNIQUE (account_id, dedupe_key)
        )
        """
    )
    op.execute("CREATE INDEX alerts_by_account ON alerts (account_id, fired_at)")
    # One row per alert and channel (webhook, kafka): the outbox its senders claim.
    op.execute(
        """
        CREATE TABLE alert_deliveries (
            alert_id text NOT NULL REFERENCES alerts (alert_id),
            channel text NOT NULL CHECK (channel IN ('webhook', 'kafka')),
            state text NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'delivered', 'failed')),
            attempts integer NOT NULL DEFAULT 0,
            next_attempt_at timestamptz NOT NULL DEFAULT now(),
            delivered_at timestamptz,
            PRIMARY KEY (alert_id, channel)
        )
        """
    )
    op.execute(
        "CREATE INDEX alert_deliveries_due ON alert_deliveries (next_attempt_at) "
        "WHERE state = 'pending'"
    )
    op.execute(
        """
        CREATE TABLE alert_attempts (
            alert_id text NOT NULL,
            channel text NOT NULL,
            attempt integer NOT NULL,
            at timestamptz NOT NULL DEFAULT now(),
            -- the receiver's HTTP status; null when none came (refused, timed out)
            status integer,
            error text NOT NULL DEFAULT '',
            PRIMARY KEY (alert_id, channel, attempt),
            FOREIGN KEY (alert_id, channel) REFERENCES alert_deliveries (alert_id, channel)
        )
        """
    )


def downgrade() -> None:
    for table in ("alert_attempts", "alert_deliveries", "alerts", "alert_webhooks", "alert_rules"):
        op.execute(f"DROP TABLE {table}")
