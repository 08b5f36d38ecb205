from django.apps import AppConfig


class AiModelConfig(AppConfig):
    name = "ai_model"
