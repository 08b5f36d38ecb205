from django.apps import AppConfig


class WebKnowledgeConfig(AppConfig):
    name = "web_knowledge"
