"""The first schema: card topics, feedback with its reasons, the JWT replay cache.

Tables that exist already (a SQLite file from a version before Alembic) are kept as they are: the
same columns and keys.

Revision ID: initial_schema
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "initial_schema"
down_revision = None
branch_labels = None
depends_on = None


def _tables(meta: sa.MetaData) -> None:
    sa.Table("card_topic", meta,
             sa.Column("service_id", sa.Text, primary_key=True),
             sa.Column("card_uuid", sa.Text, primary_key=True),
             sa.Column("topic", sa.Text, nullable=False),
             sa.Column("hook_instance", sa.Text),
             sa.Column("seen_at", sa.Text, nullable=False))
    sa.Table("feedback", meta,
             sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
             sa.Column("service_id", sa.Text, nullable=False),
             sa.Column("card", sa.Text, nullable=False),
             sa.Column("outcome", sa.Text, sa.CheckConstraint("outcome IN ('accepted', 'overridden')"),
                       nullable=False),
             sa.Column("outcome_timestamp", sa.Text, nullable=False),
             sa.Column("accepted_suggestions", sa.Text, nullable=False),
             sa.Column("reason_key", sa.Text, nullable=False),
             sa.Column("user_comment", sa.Text),
             sa.Column("received_at", sa.Text, nullable=False),
             sa.Index("feedback_once", "service_id", "card", "outcome", "outcome_timestamp",
                      "accepted_suggestions", "reason_key", unique=True))
    sa.Table("feedback_reason", meta,
             sa.Column("feedback_id", sa.Integer, sa.ForeignKey("feedback.id"), primary_key=True),
             sa.Column("system", sa.Text, primary_key=True),
             sa.Column("code", sa.Text, primary_key=True),
             sa.Column("display", sa.Text))
    sa.Table("seen_jti", meta,
             sa.Column("iss", sa.Text, primary_key=True),
             sa.Column("jti", sa.Text, primary_key=True),
             sa.Column("expires_at", sa.Float, nullable=False),
             sa.Index("seen_jti_expiry", "expires_at"))


def upgrade() -> None:
    meta = sa.MetaData()
    _tables(meta)
    meta.create_all(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    meta = sa.MetaData()
    _tables(meta)
    meta.drop_all(op.get_bind(), checkfirst=True)
