"""Plans: their versions, and which version each account is on from when.

Revision ID: 0002
Revises: 0001
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A version is never changed or deleted: a change is the next version, so an
    # assignment keeps meaning what it meant when it was made.
    op.execute(
        """
        CREATE TABLE plan_versions (
            plan_id text NOT NULL CHECK (plan_id ~ '^[A-Za-z0-9._:-]{1,128}$'),
            version integer NOT NULL CHECK (version >= 1),
            name text NOT NULL DEFAULT '' CHECK (length(name) <= 256),
            -- meterline.quotas.plans.PlanLimits as JSON; spend caps as decimal strings
            limits jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(limits) = 'object'),
            -- money is NUMERIC: exact, as the plan was written (at most 1,000 and $1,000)
            price_multiplier numeric(10, 6) NOT NULL DEFAULT 1 CHECK (price_multiplier >= 0),
            request_fee_usd numeric(16, 12) NOT NULL DEFAULT 0 CHECK (request_fee_usd >= 0),
            billing text NOT NULL DEFAULT 'postpaid' CHECK (billing IN ('postpaid', 'prepaid')),
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (plan_id, version)
        )
        """
    )
    # An assignment holds from effective_from until the account's next one: the plan
    # in force at t is the row with the latest effective_from <= t.
    op.execute(
        """
        CREATE TABLE account_plans (
            account_id text NOT NULL
                CONSTRAINT account_plans_account_fkey REFERENCES accounts (account_id),
            plan_id text NOT NULL,
            version integer NOT NULL,
            effective_from timestamptz NOT NULL,
            assigned_at timestamptz NOT NULL DEFAULT now(),
            -- "cli", or "api:<key id>" of the admin key that assigned it
            assigned_by text NOT NULL DEFAULT '' CHECK (length(assigned_by) <= 256),
            PRIMARY KEY (account_id, effective_from),
            CONSTRAINT account_plans_plan_fkey FOREIGN KEY (plan_id, version)
                REFERENCES plan_versions (plan_id, version)
        )
        """
    )
    op.execute("CREATE INDEX account_plans_by_plan ON account_plans (plan_id, version)")
