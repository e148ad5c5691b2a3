"""The contract the producer and the workers share, and nothing else.

Typed settings, wire schemas, the Celery app and its queues, the Redis key schema
and the embedded Redis default. ``producer`` and ``workers`` both import this
package and never each other.
"""
