"""Process metadata on samples: container, Kubernetes pod and service name.

A profile is only useful in a fleet if it says *what* ran: which container, which pod in which
namespace, which service. The agent resolves this per process (cached), on the host, and adds
it to every sample as OTel semantic-convention attributes (``container.id``,
``k8s.pod.name``, ``k8s.namespace.name``, ``k8s.container.name``, ``k8s.pod.uid``,
``service.name``). See docs/design/metadata.md.
"""

# Import the parts from their modules (agent.metadata.resolver, .sink, .settings): the settings
# module is imported by agent.settings, so this package must not pull in the actors here.
