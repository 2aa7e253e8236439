"""Escalation: channels (Slack-compatible webhook, SMTP e-mail, PagerDuty Events v2, generic JSON
webhook), message rendering, delivery with retries and backoff, health paging state, the incident
bundle a page links to, and the routes applied as Prefect automations. One module per concern."""

from tasks.notifications.channels import DeliveryError, send
from tasks.notifications.delivery import FAILED_EVENT, channels_for, deliver
from tasks.notifications.model import Delivery, Message
from tasks.notifications.paging import PagingDecision, PagingState, decide
from tasks.notifications.routes import Route, apply_routes, automation_for, find_route, load_routes

__all__ = [
    "FAILED_EVENT",
    "Delivery",
    "DeliveryError",
    "Message",
    "PagingDecision",
    "PagingState",
    "Route",
    "apply_routes",
    "automation_for",
    "channels_for",
    "decide",
    "deliver",
    "find_route",
    "load_routes",
    "send",
]
