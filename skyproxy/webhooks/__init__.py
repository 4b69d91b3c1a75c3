"""Webhooks: skyproxy receives Skytells' callbacks, stores them, and relays them to the app.

A leaf of its own: the receiver, the store and the relay never import the proxy handler
or the daemon. The daemon starts and stops them; the proxy only records routes.
"""
