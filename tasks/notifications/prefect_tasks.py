"""The Prefect tasks of escalation: the plain functions of this package, wrapped once, here."""

from __future__ import annotations

from tasks.errors import ParameterError, SettingsError
from tasks.notifications import delivery, incident, paging, runs
from tasks.ops_task import ops_task

# Delivery retries each channel itself (with backoff, per channel): a task retry would resend to the
# channels that already have the message.
deliver_task = ops_task(delivery.deliver, name="deliver-notification")
read_run_task = ops_task(
    runs.read_run, name="read-flow-run", retries=2, retry_delay_seconds=2, permanent=(ParameterError,)
)
collect_incident_task = ops_task(
    incident.collect_incident_bundle, name="collect-incident-bundle", retries=1, retry_delay_seconds=5
)
load_paging_state_task = ops_task(
    paging.load_state, name="load-paging-state", retries=2, retry_delay_seconds=2, permanent=(SettingsError,)
)
save_paging_state_task = ops_task(
    paging.save_state, name="save-paging-state", retries=2, retry_delay_seconds=2
)
