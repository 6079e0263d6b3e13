"""A Kubernetes API server emulator on loopback, built on kmock, for portpolicy's system e2e.

Modules, one concern each:

- ``paths``: URL -> (group, version, resource, namespace, name, subresource).
- ``errors``: Kubernetes ``Status`` failure bodies.
- ``resources``: the resource types served, built in and added by CustomResourceDefinitions.
- ``selectors``: label and field selectors.
- ``fields``: managed fields and server-side apply (list-maps merged by key).
- ``patches``: JSON merge, strategic merge and JSON patches as kubectl sends them.
- ``objects``: what the API server does to an object on write (uids, defaults, allocations).
- ``store``: objects, resourceVersions, the event history and watches.
- ``tables``: ``kubectl get`` Table responses, printer columns included.
- ``discovery``: /api, /apis, /version and the group/version resource lists.
- ``server``: the kmock handler that ties them to HTTP.
"""
